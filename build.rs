//! Rebuilds when a migration in `sql/` is added or changed: they are embedded in the binary
//! (`refinery::embed_migrations!`), which a new file alone would not trigger.
fn main() {
    println!("cargo:rerun-if-changed=sql");
}
