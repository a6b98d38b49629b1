-- rackboot inventory, schema 1 (user_version 1): made with master/inventory.py MIGRATIONS[0]
BEGIN TRANSACTION;
CREATE TABLE nodes (
        id TEXT PRIMARY KEY, serial TEXT, ip TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
        adopted INTEGER NOT NULL DEFAULT 1, plan TEXT, image TEXT, version INTEGER,
        state TEXT NOT NULL, booted_slot TEXT, booted_version INTEGER, last_phase TEXT, last_action TEXT,
        last_error TEXT, last_error_at REAL, install_bytes INTEGER, install_seconds REAL,
        installing INTEGER NOT NULL DEFAULT 0, last_time REAL NOT NULL DEFAULT 0
    );
INSERT INTO "nodes" VALUES('52-54-00-12-34-56','10000000cafe','10.213.0.10',1700000000.5,1700000301.25,1,'default','example',2,'ok','b',2,'confirm','installed',NULL,NULL,12345678,7.25,0,1700000300.75);
CREATE TABLE reports (
        id INTEGER PRIMARY KEY, node TEXT NOT NULL, received REAL NOT NULL, ip TEXT, time REAL NOT NULL,
        phase TEXT NOT NULL, slot TEXT, version INTEGER, bytes INTEGER NOT NULL, seconds REAL NOT NULL,
        error TEXT, output TEXT, late INTEGER NOT NULL DEFAULT 0
    );
INSERT INTO "reports" VALUES(1,'52-54-00-12-34-56',1700000100.75,'10.213.0.10',1700000100.25,'boot','b',2,1234,5.5,NULL,NULL,0);
INSERT INTO "reports" VALUES(2,'52-54-00-12-34-56',1700000301.25,'10.213.0.10',1700000300.75,'confirm','b',2,0,0.0,NULL,NULL,0);
CREATE TABLE slots (
        node TEXT NOT NULL, slot TEXT NOT NULL, image TEXT, version INTEGER, state TEXT NOT NULL,
        PRIMARY KEY (node, slot)
    );
INSERT INTO "slots" VALUES('52-54-00-12-34-56','a','example',1,'good');
INSERT INTO "slots" VALUES('52-54-00-12-34-56','b','example',2,'good');
CREATE INDEX reports_node ON reports (node, id);
COMMIT;
PRAGMA user_version = 1;
