//! `outlived`: the agent (see `outlive::cli::OutlivedArgs`).

fn main() {
    std::process::exit(outlive::cli::outlived_main());
}
