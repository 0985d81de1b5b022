//! The database: created if missing, migrated, pooled.

use crate::settings::Settings;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::time::Duration;

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("creating the database: {0}")]
    Create(#[source] sqlx::Error),
    #[error("applying migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

/// Connects (creating the database if missing) and applies the migrations.
pub async fn connect(settings: &Settings) -> Result<PgPool, ConnectError> {
    let url = &settings.database_url;
    if !Postgres::database_exists(url)
        .await
        .map_err(ConnectError::Connect)?
    {
        Postgres::create_database(url)
            .await
            .map_err(ConnectError::Create)?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(ConnectError::Connect)?;
    MIGRATOR.run(&pool).await.map_err(ConnectError::Migrate)?;
    Ok(pool)
}
