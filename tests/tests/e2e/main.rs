//! The end-to-end tests, one module per area, in one test binary. Each test gets its own
//! database, virtual host and api (see the `tests` harness); the fault suite under load is
//! `tests/tests/chaos/`, a binary of its own (`make chaos`).

mod abuse;
mod accounts;
mod attacks;
mod events;
mod observability;
mod operations;
mod orders;
mod organizers;
mod payments;
mod presale;
mod promo_codes;
mod queue;
mod ticket_types;
mod tickets;
mod waitlist;
mod webhooks;
