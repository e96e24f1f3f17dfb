//! What purchase messages carry, and how they are read.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One order in a purchase message. The order row is the source of truth; the message only
/// says which order to look at, which event (to group a batch without a query), and the
/// order's trace (the W3C `traceparent` of the request that placed it), which the worker
/// continues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseMessage {
    pub order_id: Uuid,
    pub event_id: Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The body of a purchase message: the orders of one partition that were stored together,
/// in the order they were accepted. One message per stored batch and partition rather than
/// per order: a persistent message on a quorum queue costs the broker the same whether it
/// names one order or hundreds, and the order, not the message, is the unit of
/// idempotency (the worker skips an order that is no longer `QUEUED`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseBatch {
    pub orders: Vec<PurchaseMessage>,
}

/// Reads a purchase message: a [`PurchaseBatch`], or a single [`PurchaseMessage`] (what
/// earlier versions sent, one per order; still read, so that messages queued before an
/// upgrade are decided after it).
pub fn decode_purchase(body: &[u8]) -> Result<Vec<PurchaseMessage>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Body {
        Batch(PurchaseBatch),
        One(PurchaseMessage),
    }
    match serde_json::from_slice(body)? {
        Body::Batch(batch) => Ok(batch.orders),
        Body::One(one) => Ok(vec![one]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_messages_are_read_in_both_forms() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let one = PurchaseMessage { order_id: a, event_id: b, traceparent: None };
        let traced = PurchaseMessage {
            order_id: b,
            event_id: b,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let batch = PurchaseBatch { orders: vec![one.clone(), traced] };
        assert_eq!(decode_purchase(&serde_json::to_vec(&batch).unwrap()).unwrap(), batch.orders);
        assert_eq!(decode_purchase(&serde_json::to_vec(&one).unwrap()).unwrap(), vec![one.clone()]);
        // What earlier versions sent, without a trace.
        let old = format!(r#"{{"orders": [{{"order_id": "{a}", "event_id": "{b}"}}]}}"#);
        assert_eq!(decode_purchase(old.as_bytes()).unwrap(), vec![one]);
        assert!(decode_purchase(b"{not json").is_err());
        assert!(decode_purchase(br#"{"order_id": 42}"#).is_err());
    }
}
