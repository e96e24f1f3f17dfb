//! RabbitMQ: the connection [`mod@pool`], the purchase [`topology`] (declared by one function
//! that api and worker both call) with the partition hash, the purchase [`messages`], and
//! the [`publisher`]: a confirm-mode channel and the purchase publisher built on it.
//!
//! Topology:
//! ```text
//! exchange orders.purchase (direct) --"k"--> quorum queue orders.purchase.{k}, k in 0..N
//!                                              x-single-active-consumer: true
//!                                              dead letters -> exchange orders.purchase.dlx (fanout)
//!                                                              -> queue orders.purchase.dead
//! exchange orders.events (topic) --"order.<status>"--> queues of the consumers' own
//! ```
//! An order's message goes to partition `partition_of(event_id, N)`, so all orders of one
//! event sit in one queue and are allocated in arrival order by its single active consumer.

pub mod messages;
pub mod pool;
pub mod publisher;
pub mod topology;

pub use messages::{PurchaseBatch, PurchaseMessage, decode_purchase};
pub use pool::{Manager, Object, Pool, pool};
pub use publisher::{CONFIRM_TIMEOUT, ConfirmChannel, PUBLISH_WINDOW, PublishError, Publisher, RETRY_AFTER_FAILURE};
pub use topology::{
    ORDER_EVENTS_EXCHANGE, PURCHASE_DEAD_LETTER_EXCHANGE, PURCHASE_DEAD_LETTER_QUEUE, PURCHASE_EXCHANGE,
    declare_topology, partition_of, purchase_queue,
};
