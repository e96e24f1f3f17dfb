//! The purchase topology and the partition hash.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ExchangeKind};
use uuid::Uuid;

pub const PURCHASE_EXCHANGE: &str = "orders.purchase";
pub const PURCHASE_DEAD_LETTER_EXCHANGE: &str = "orders.purchase.dlx";
pub const PURCHASE_DEAD_LETTER_QUEUE: &str = "orders.purchase.dead";
/// Topic exchange of order status changes (`order.<status>`, see `common::notifications`).
pub const ORDER_EVENTS_EXCHANGE: &str = "orders.events";

/// The name of partition `k`'s queue.
pub fn purchase_queue(partition: u16) -> String {
    format!("{PURCHASE_EXCHANGE}.{partition}")
}

/// The partition of an event: FNV-1a (64 bit) of the id's 16 bytes, modulo `partitions`.
///
/// This must never change between versions: api and worker processes of different builds
/// share the queues, and all orders of one event must meet in one partition. The tests pin
/// its values.
pub fn partition_of(event_id: Uuid, partitions: u16) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = event_id.as_bytes().iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME));
    // `partitions` is at least 1 (configuration enforces it); the remainder fits in u16.
    (hash % u64::from(partitions.max(1))) as u16
}

/// Declares the topology (purchase partitions, dead letters, order events). Idempotent: every process calls it on each channel it
/// opens, with the same arguments (RabbitMQ refuses a re-declaration that differs).
pub async fn declare_topology(channel: &Channel, partitions: u16) -> lapin::Result<()> {
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(PURCHASE_EXCHANGE.into(), ExchangeKind::Direct, durable, FieldTable::default()).await?;
    channel
        .exchange_declare(PURCHASE_DEAD_LETTER_EXCHANGE.into(), ExchangeKind::Fanout, durable, FieldTable::default())
        .await?;
    channel.exchange_declare(ORDER_EVENTS_EXCHANGE.into(), ExchangeKind::Topic, durable, FieldTable::default()).await?;
    let queue_options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    let mut dead_args = FieldTable::default();
    dead_args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel.queue_declare(PURCHASE_DEAD_LETTER_QUEUE.into(), queue_options, dead_args).await?;
    channel
        .queue_bind(
            PURCHASE_DEAD_LETTER_QUEUE.into(),
            PURCHASE_DEAD_LETTER_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for partition in 0..partitions {
        let queue: ShortString = purchase_queue(partition).into();
        channel.queue_declare(queue.clone(), queue_options, partition_queue_arguments()).await?;
        channel
            .queue_bind(
                queue,
                PURCHASE_EXCHANGE.into(),
                partition.to_string().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

fn partition_queue_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    // One consumer at a time per partition: orders of one event are allocated in the order
    // they arrived, and a standby consumer takes over when the active one goes away.
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    // Messages the worker cannot decode are rejected to here instead of blocking the queue.
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(PURCHASE_DEAD_LETTER_EXCHANGE.into()));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if this test fails, the hash changed and a rolling upgrade would split
    /// events across partitions. Do not update the numbers; restore the function.
    #[test]
    fn partition_hash_is_stable() {
        let cases = [
            ("00000000-0000-0000-0000-000000000000", 8, 5),
            ("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f", 8, 5),
            ("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f", 16, 13),
            ("01a20c86-f247-7730-b23d-6f1e5d19db67", 8, 0),
            ("01a20c86-f247-7730-b23d-6f1e5d19db67", 16, 8),
            ("7f3e2b10-4c5d-4e6f-8a9b-0c1d2e3f4a5b", 8, 3),
            ("7f3e2b10-4c5d-4e6f-8a9b-0c1d2e3f4a5b", 1000, 979),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", 1000, 133),
        ];
        let got: Vec<u16> = cases.iter().map(|(id, n, _)| partition_of(Uuid::parse_str(id).unwrap(), *n)).collect();
        let want: Vec<u16> = cases.iter().map(|(_, _, k)| *k).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // FNV-1a 64 of the empty input is the offset basis; modulo u16::MAX + 1 exposes the
        // low bits of the full hash.
        let fnv = |bytes: &[u8]| {
            bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
        let id = Uuid::parse_str("01936d6e-5c2a-7c3e-9a41-2f0b3c4d5e6f").unwrap();
        assert_eq!(u64::from(partition_of(id, 1024)), fnv(id.as_bytes()) % 1024);
    }

    #[test]
    fn partitions_spread_events() {
        let mut counts = [0u32; 8];
        for _ in 0..8000 {
            counts[usize::from(partition_of(Uuid::now_v7(), 8))] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "uneven spread: {counts:?}");
    }

    #[test]
    fn single_partition_takes_everything() {
        assert_eq!(partition_of(Uuid::now_v7(), 1), 0);
    }
}
