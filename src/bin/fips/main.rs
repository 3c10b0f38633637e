//! The `fips` command-line tool.

fn main() {}
