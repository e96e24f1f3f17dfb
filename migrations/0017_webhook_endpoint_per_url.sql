-- One user could register the same URL ten times and turn each order into twenty POSTs to a
-- third party. An endpoint is now unique per user and URL; duplicates registered before are
-- merged into the oldest (their deliveries go with them: a receiver saw each of them anyway).
DELETE FROM webhook_endpoints d USING webhook_endpoints k
WHERE d.user_id = k.user_id AND d.url = k.url AND d.id > k.id;

ALTER TABLE webhook_endpoints ADD CONSTRAINT webhook_endpoints_user_url_key UNIQUE (user_id, url);
