-- Accounts that stop existing: a deactivated account keeps its rows (orders, events, check-ins)
-- but can neither log in nor use a token issued before; a deleted one is gone. Both revoke the
-- account's tokens in every api process, the way a role or password change does (0006):
-- deactivation raises the token version (the same trigger, one more column), deletion is
-- remembered in `deleted_users` for the longest token lifetime and announced with the
-- version 2147483647, which no token can carry. Triggers, so that an operator's
-- `DELETE FROM users` in psql revokes as surely as the api's `DELETE /users/{id}`.

ALTER TABLE users ADD COLUMN deactivated_at TIMESTAMPTZ;

CREATE OR REPLACE FUNCTION raise_token_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.role IS DISTINCT FROM OLD.role OR NEW.password_hash IS DISTINCT FROM OLD.password_hash
        OR NEW.deactivated_at IS DISTINCT FROM OLD.deactivated_at THEN
        NEW.token_version := OLD.token_version + 1;
        NEW.token_version_at := now();
    END IF;
    RETURN NEW;
END
$$;

DROP TRIGGER users_raise_token_version ON users;
CREATE TRIGGER users_raise_token_version
    BEFORE UPDATE OF role, password_hash, deactivated_at ON users
    FOR EACH ROW EXECUTE FUNCTION raise_token_version();

-- Deleted accounts of the last 7 days (older tokens have expired anyway); the api loads them
-- with the raised versions when its listener connects.
CREATE TABLE deleted_users (
    id         UUID PRIMARY KEY,
    deleted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION remember_deleted_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO deleted_users (id) VALUES (OLD.id) ON CONFLICT (id) DO UPDATE SET deleted_at = now();
    DELETE FROM deleted_users WHERE deleted_at < now() - interval '7 days';
    PERFORM pg_notify('token_revocations', OLD.id::text || ':2147483647');
    RETURN NULL;
END
$$;

CREATE TRIGGER users_remember_deleted
    AFTER DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION remember_deleted_user();
