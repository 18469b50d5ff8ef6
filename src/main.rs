fn main() {
    std::process::exit(ray_launch::cli::main());
}
