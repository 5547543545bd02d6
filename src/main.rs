fn main() {
    println!("saccade");
}
