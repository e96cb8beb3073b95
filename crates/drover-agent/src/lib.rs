//! The in-guest agent (drover-agent) and its in-guest CLI (drover-guest)
