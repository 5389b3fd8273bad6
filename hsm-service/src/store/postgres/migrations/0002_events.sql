-- Schema 2: the event outbox and the notification preferences (issue 12).
--
-- The stream's head (events.head, u64 little endian) is created here, so that the
-- first events of concurrent instances lock an existing row (SELECT ... FOR UPDATE)
-- instead of racing to insert it.
CREATE TABLE events (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE notification_prefs (k bytea PRIMARY KEY, v bytea NOT NULL);
INSERT INTO meta (k, v)
VALUES (convert_to('events.head', 'UTF8'), '\x0000000000000000'::bytea)
ON CONFLICT (k) DO NOTHING;
