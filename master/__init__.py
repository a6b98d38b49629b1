"""What runs on the master: publish images, assign plans, sign them, serve them."""
