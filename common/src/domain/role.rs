//! What a user may do.

use serde::{Deserialize, Serialize};

/// A user's role. Stored as text (`'user'`, `'staff'`, `'admin'`) under a CHECK constraint.
///
/// `staff` is door staff: a user who may also check tickets in (`POST /check-ins`), and
/// nothing else an admin may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum Role {
    User,
    Staff,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Staff => "staff",
            Role::Admin => "admin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn serialises_lowercase() {
        assert_eq!(serde_json::to_string(&Role::Admin).unwrap(), "\"admin\"");
        assert_eq!(serde_json::from_str::<Role>("\"user\"").unwrap(), Role::User);
        assert_eq!(serde_json::from_str::<Role>("\"staff\"").unwrap(), Role::Staff);
        assert!(serde_json::from_str::<Role>("\"root\"").is_err());
    }
}
