//! The drover command-line interface
