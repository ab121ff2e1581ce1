-- legacy-version: 7
-- Instance names as the small integers that multi-writer tokens carry
-- (`m5~1.6`: instance 1 at position 6). An ID is assigned on first use and
-- never changes, so tokens handed to clients stay valid. Named as in Synapse.
CREATE TABLE instance_map (
    instance_id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_name TEXT NOT NULL UNIQUE
);
