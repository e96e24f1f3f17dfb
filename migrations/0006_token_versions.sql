-- Tokens that stop working: every access token carries the account's `token_version` of the
-- moment it was issued. A change of role or password raises the version (a trigger, so no
-- writer can forget it: the api, `api create-admin`, an operator in psql), and the api
-- refuses tokens that carry an older one. Only accounts whose version rose within the
-- longest token lifetime (7 days) can hold such tokens, so the api keeps just those in
-- memory: loaded at start, kept current by the `token_revocations` notification.

ALTER TABLE users
    ADD COLUMN token_version    INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN token_version_at TIMESTAMPTZ;

CREATE INDEX users_token_version_at ON users (token_version_at) WHERE token_version_at IS NOT NULL;

CREATE FUNCTION raise_token_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.role IS DISTINCT FROM OLD.role OR NEW.password_hash IS DISTINCT FROM OLD.password_hash THEN
        NEW.token_version := OLD.token_version + 1;
        NEW.token_version_at := now();
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_raise_token_version
    BEFORE UPDATE OF role, password_hash ON users
    FOR EACH ROW EXECUTE FUNCTION raise_token_version();

-- Announces `<user id>:<version>` on commit, to every api process.
CREATE FUNCTION announce_token_revocation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('token_revocations', NEW.id::text || ':' || NEW.token_version::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER users_announce_token_revocation
    AFTER UPDATE ON users
    FOR EACH ROW WHEN (NEW.token_version > OLD.token_version)
    EXECUTE FUNCTION announce_token_revocation();
