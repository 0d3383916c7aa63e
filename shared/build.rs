// sqlx_macros::migrate! embeds the migration files at compile time; without
// this a new migration is not picked up until something else in the crate
// changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
