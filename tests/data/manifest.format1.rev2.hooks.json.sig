jgQฬT๋NkKEKÞtjๆ๔]แก6þ^Zี
ÞZc>oÞบy๙ใ๙ü๏ำ^M‘ขi	้9ÛAฺฑ0Pธ