//! Compiles proto/ with protox (pure Rust), so building needs no protoc binary.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/change_event.proto");
    let fds = protox::compile(["proto/change_event.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
