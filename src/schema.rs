//! placeholder: schema
