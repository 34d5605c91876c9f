//! Print the token ids of each argument with a model's tokenizer (HF directory or GGUF file).
//! `cargo run --example tokenize -- MODEL "text" ...`
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tok = sqlora::load::open(std::path::Path::new(&args[0]))?.tokenizer()?;
    for text in &args[1..] {
        println!("{:?}", tok.encode(text)?);
    }
    Ok(())
}
