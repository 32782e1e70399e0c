//! `outlivectl`: the operator's tool (see `outlive::cli::Outlivectl`).

fn main() {
    std::process::exit(outlive::cli::outlivectl_main());
}
