//! The `kekfs` binary: everything lives in the library's `cli` module.

fn main() {
    std::process::exit(kekfs::cli::main());
}
