//! placeholder: pgoutput
