//! Wire types of droverd's HTTP/JSON API and a client for it
