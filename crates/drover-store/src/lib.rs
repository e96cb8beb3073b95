//! Durable store for droverd's records (embedded redb engine)
