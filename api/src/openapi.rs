//! The OpenAPI document, served at `/api/v1/openapi.json` (Swagger UI at `/docs`): what
//! every route shares is declared here, the paths come from the routers themselves
//! ([`crate::routes::api`]), which declare each route once, with its handler's annotation.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Turnstile",
        description = "Ticket sales that survive a stampede. Errors are `{\"error\": {\"code\", \"message\"}}`; \
                       timestamps are RFC 3339 UTC; ids are UUID v7; money is a decimal string.",
    ),
    components(schemas(ErrorBody, ErrorDetail, common::notifications::OrderNotification)),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Sign-up, log-in and the caller's own account"),
        (name = "events", description = "The event catalogue, and each event's ticket types and promo codes"),
        (name = "orders", description = "Buying tickets and following an order to its outcome"),
        (name = "organizers", description = "An event's orders and attendees, as JSON pages or a CSV export (admin)"),
        (name = "tickets", description = "Ticket QR codes and check-in at the door (door staff: the `staff` role)"),
        (name = "waitlist", description = "Waiting lists of sold-out events, served in join order from released tickets"),
        (name = "payments", description = "The payment provider's signed webhook, refunds, and late payments to refund"),
        (name = "webhooks", description = "The caller's webhook endpoints for order events, and their deliveries \
            (the delivered body is the `OrderNotification` schema)"),
        (name = "operations", description = "Health probes"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The answers any operation may give besides its own, documented here once rather than on
/// every handler: `503` everywhere (a dependency is down, or the request ran past the time
/// limit); `401` wherever a token is required; `400`, `413`, `415` and `422` wherever a JSON
/// body is read. An operation that documents one of these itself keeps its own text.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                let json_body =
                    operation.request_body.as_ref().is_some_and(|body| body.content.contains_key("application/json"));
                let secured = operation.security.as_ref().is_some_and(|security| !security.is_empty());
                let mut add = |status: &str, description: &str| {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error_response(description));
                };
                if secured {
                    add("401", "Missing, malformed or expired token");
                }
                if json_body {
                    add("400", "Malformed JSON");
                    add("413", "Body larger than the limit");
                    add("415", "Not JSON (`Content-Type: application/json` expected)");
                    add("422", "The body breaks a rule; `error.code` names it");
                }
                add(
                    "503",
                    "A dependency is unavailable or the request took too long; retry after `Retry-After` seconds",
                );
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    ResponseBuilder::new().description(description).content("application/json", body).build().into()
}

/// The document's parts that are not paths: information, shared schemas, security, tags.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `document` (the routers' paths on [`base`]) with the answers every operation shares.
pub fn finish(mut document: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    CommonErrors.modify(&mut document);
    document
}

/// The whole document, as served (for the tests).
#[cfg(test)]
pub fn document() -> utoipa::openapi::OpenApi {
    finish(crate::routes::api(0).split_for_parts().1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_lists_every_route() {
        let doc = super::document();
        for path in [
            "/api/v1/signup",
            "/api/v1/login",
            "/api/v1/me",
            "/api/v1/me/events",
            "/api/v1/events",
            "/api/v1/events/{id}",
            "/api/v1/orders",
            "/api/v1/orders/{id}",
            "/api/v1/orders/quote",
            "/api/v1/orders/{id}/cancel",
            "/api/v1/orders/{id}/status",
            "/api/v1/late-payments",
            "/api/v1/late-payments/{id}/refund",
            "/api/v1/webhook-endpoints",
            "/api/v1/users",
            "/api/v1/events/{id}/image",
            "/api/v1/tickets/{id}/qr.png",
            "/api/v1/check-ins",
            "/api/v1/users/{id}/role",
            "/api/v1/webhook-endpoints/{id}",
            "/api/v1/webhook-endpoints/{id}/deliveries",
            "/api/v1/me/tickets",
            "/api/v1/orders/{id}/refund",
            "/api/v1/refunds",
            "/api/v1/events/{id}/waitlist",
            "/api/v1/me/waitlist",
            "/health/live",
            "/health/ready",
        ] {
            assert!(doc.paths.paths.contains_key(path), "missing {path}");
        }
    }
}
