//! droverd's library: VM manager, guest channel broker, host API
