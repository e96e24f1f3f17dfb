//! A database per test, copied from a template migrated once per set of migrations.

use sqlx::{Connection, Executor, PgPool};
use uuid::Uuid;

use crate::Services;

/// A fresh database, dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    pub(crate) name: String,
    admin_url: String,
}

impl TestDb {
    /// A database with the schema: a copy of a template migrated once per set of migrations
    /// (the processes the tests start find nothing left to migrate).
    pub async fn create(services: &Services) -> Self {
        let template = migrated_template(&services.database_url).await;
        Self::create_from(services, &format!("TEMPLATE {template}")).await
    }

    /// A database without the schema, for the tests of migrating one.
    pub async fn empty(services: &Services) -> Self {
        Self::create_from(services, "").await
    }

    async fn create_from(services: &Services, options: &str) -> Self {
        let name = format!("t_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&services.database_url).await.expect("connect to PostgreSQL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name} {options}")))
            .await
            .expect("create test database");
        let url = database_url(&services.database_url, &name);
        let pool = sqlx::postgres::PgPoolOptions::new().max_connections(5).connect(&url).await.expect("connect");
        TestDb { url, pool, name, admin_url: services.database_url.clone() }
    }
}

/// The URL of database `name` on the server of `admin_url`.
fn database_url(admin_url: &str, name: &str) -> String {
    let (base, _) = admin_url.rsplit_once('/').expect("DATABASE_URL has a database name");
    format!("{base}/{name}")
}

/// The name of a database migrated with these migrations (their versions and checksums
/// name it), made once by whichever test gets there first, under an advisory lock: built
/// under a name of its own and renamed when complete, so a test that was killed halfway
/// leaves no half-migrated template behind.
async fn migrated_template(admin_url: &str) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for migration in common::db::MIGRATOR.iter() {
        digest.update(migration.version.to_le_bytes());
        digest.update(&*migration.checksum);
    }
    let hash = digest.finalize();
    let name = format!("t_template_{}", hash.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>());
    let mut admin = sqlx::PgConnection::connect(admin_url).await.expect("connect to PostgreSQL");
    let key = i64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
    sqlx::query("SELECT pg_advisory_lock($1)").bind(key).execute(&mut admin).await.expect("lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .expect("look for the template");
    if !exists {
        let building = format!("{name}_building");
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)")))
            .await
            .expect("drop an unfinished template");
        admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {building}"))).await.expect("create the template");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&database_url(admin_url, &building))
            .await
            .expect("connect to the template");
        common::db::MIGRATOR.run(&pool).await.expect("migrate the template");
        pool.close().await;
        admin
            .execute(sqlx::AssertSqlSafe(format!("ALTER DATABASE {building} RENAME TO {name}")))
            .await
            .expect("name the template");
    }
    sqlx::query("SELECT pg_advisory_unlock($1)").bind(key).execute(&mut admin).await.expect("unlock");
    name
}

impl TestDb {
    /// Drops the database now, closing its connections (`WITH (FORCE)`): whoever uses it
    /// from then on is told it does not exist.
    pub async fn drop_now(&self) {
        let mut admin = sqlx::PgConnection::connect(&self.admin_url).await.expect("connect to PostgreSQL");
        admin
            .execute(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", self.name)))
            .await
            .expect("drop the test database");
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        clean_up(async move {
            let mut admin = sqlx::PgConnection::connect(&admin_url).await.ok()?;
            admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).await.ok()
        });
    }
}

/// Runs a clean-up from `Drop`, which may run outside any runtime (or inside one that must
/// not be blocked): on a thread of its own with a runtime of its own, waited for.
pub(crate) fn clean_up<T>(work: impl std::future::Future<Output = Option<T>> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        runtime.block_on(work).map(|_| ())
    })
    .join();
}
