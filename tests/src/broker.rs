//! A RabbitMQ virtual host per test, the management API of every node, and consumers of
//! the order events.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::Services;
use crate::db::clean_up;

/// A fresh RabbitMQ virtual host (so each test has its own queues), deleted when dropped.
pub struct TestBroker {
    /// AMQP URL of the virtual host: one per node, comma-separated, when RabbitMQ runs as a
    /// cluster (api and worker take the list).
    pub url: String,
    pub vhost: String,
    management: Management,
}

/// The RabbitMQ management HTTP API of every node (credentials taken from the URLs): a
/// request goes to the first node that answers, so it works while a node is down.
#[derive(Clone)]
pub struct Management {
    nodes: Vec<(String, String, String)>,
}

impl Management {
    pub fn new(urls: &[String]) -> Self {
        let nodes = urls
            .iter()
            .map(|url| {
                let parsed = reqwest::Url::parse(url).expect("RABBITMQ_MANAGEMENT_URL is a URL");
                let base = format!(
                    "{}://{}:{}",
                    parsed.scheme(),
                    parsed.host_str().expect("management host"),
                    parsed.port_or_known_default().expect("management port")
                );
                let user = if parsed.username().is_empty() { "guest".to_owned() } else { parsed.username().to_owned() };
                (base, user, parsed.password().unwrap_or("guest").to_owned())
            })
            .collect();
        Management { nodes }
    }

    fn user(&self) -> &str {
        &self.nodes[0].1
    }

    /// Sends the request to each node in turn until one answers (any status).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> reqwest::Result<reqwest::Response> {
        // A client per call: the drop of a `TestBroker` calls from a runtime of its own, where
        // a client's pooled connections (tied to the runtime that opened them) cannot run.
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        let mut last = None;
        for (base, user, password) in &self.nodes {
            let mut request = client.request(method.clone(), format!("{base}{path}")).basic_auth(user, Some(password));
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => return Ok(response),
                Err(err) => last = Some(err),
            }
        }
        Err(last.expect("at least one management URL"))
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let response = self.send(method, path, body.as_ref()).await.expect("RabbitMQ management API reachable");
        assert!(response.status().is_success(), "management API {path}: {}", response.status());
        response
    }

    /// `GET path`, parsed.
    pub async fn get(&self, path: &str) -> Value {
        self.call(reqwest::Method::GET, path, None).await.json().await.expect("management API answers JSON")
    }
}

impl TestBroker {
    pub async fn create(services: &Services) -> Self {
        let management = Management::new(&services.management_urls);
        let vhost = format!("t_{}", Uuid::new_v4().simple());
        management.call(reqwest::Method::PUT, &format!("/api/vhosts/{vhost}"), None).await;
        let permissions = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let path = format!("/api/permissions/{vhost}/{}", management.user());
        management.call(reqwest::Method::PUT, &path, Some(permissions)).await;
        let urls: Vec<String> = services
            .amqp_url
            .split(',')
            .map(|url| {
                let (base, _) = url.trim().rsplit_once('/').expect("AMQP_URL ends with a vhost");
                format!("{base}/{vhost}")
            })
            .collect();
        TestBroker { url: urls.join(","), vhost, management }
    }

    /// The management API of the broker's nodes.
    pub fn management(&self) -> &Management {
        &self.management
    }

    /// Number of messages ready in a queue of this virtual host (asked over AMQP, which is
    /// exact at once, unlike the management API's sampled statistics).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let connection = self.connect().await;
        let channel = connection.create_channel().await.expect("channel");
        let options = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
        let depth = channel
            .queue_declare(queue.into(), options, lapin::types::FieldTable::default())
            .await
            .map(|q| q.message_count())
            .unwrap_or(0);
        let _ = connection.close(200, "done".into()).await;
        depth
    }

    /// A connection to this virtual host (on the first node that accepts it), for tests
    /// that publish or consume themselves.
    pub async fn connect(&self) -> lapin::Connection {
        let mut last = None;
        for url in self.url.split(',') {
            match lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await {
                Ok(connection) => return connection,
                Err(err) => last = Some(err),
            }
        }
        panic!("AMQP connection: {last:?}")
    }
}

/// A queue of the test's own (exclusive to `connection`), bound to the `orders.events`
/// exchange with `routing_key` (`order.#` for every order event), and a consumer of it.
pub async fn bind_order_events(connection: &lapin::Connection, routing_key: &str) -> lapin::Consumer {
    use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    let channel = connection.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("declare a queue");
    channel
        .queue_bind(
            queue.name().clone(),
            "orders.events".into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind it to orders.events");
    channel
        .basic_consume(queue.name().clone(), "test".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume it")
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let (management, vhost) = (self.management.clone(), self.vhost.clone());
        clean_up(
            async move { management.send(reqwest::Method::DELETE, &format!("/api/vhosts/{vhost}"), None).await.ok() },
        );
    }
}
