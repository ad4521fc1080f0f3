//! placeholder: value
