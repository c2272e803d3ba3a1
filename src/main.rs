fn main() {
    println!("tidegate {}", tidegate::VERSION);
}
