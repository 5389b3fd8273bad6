-- Schema 3: the app authenticator (issue 13): devices, the per-subject state row
-- (devices, pending challenge, throttles, suspension), activations and challenges, and
-- the purge index of activations and challenges.
CREATE TABLE devices (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE device_subjects (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE device_activations (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE challenges (k bytea PRIMARY KEY, v bytea NOT NULL);
CREATE TABLE device_expiry (k bytea PRIMARY KEY, v bytea NOT NULL);
