//! Pure VM configuration types, validation and (later) diff/apply/rebase; no I/O
