// See host/Cargo.toml: glibc malloc's arenas and locks were a fifth of the IMAP benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    postern::cli::main()
}
