//! placeholder: replication
