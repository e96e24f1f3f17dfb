-- Admin features: ticket check-in and event images.

-- A ticket's first scan at the door. The primary key makes a second scan (even a
-- concurrent one) find the first instead of recording another.
CREATE TABLE check_ins (
    ticket_id     UUID PRIMARY KEY REFERENCES tickets (id),
    checked_in_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    checked_in_by UUID NOT NULL REFERENCES users (id)
);

-- An uploaded image lives in the object store under `image_key`; `image_url` then points
-- at `GET /api/v1/events/{id}/image`.
ALTER TABLE events ADD COLUMN image_key TEXT;
ALTER TABLE events ADD COLUMN image_content_type TEXT;
