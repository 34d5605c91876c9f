//! Write the last-position logits of a token sequence (f32, little-endian) for comparison with other
//! implementations. `cargo run --release --example last_logits -- MODEL OUT.bin id id id ...`
use sqlora::model::forward::{KvCache, Logits, Model};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = Model::load(std::path::Path::new(&args[0]))?;
    let ids: Vec<u32> = args[2..].iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let logits = model.forward(&ids, &mut KvCache::new(&model.config), Logits::Last);
    std::fs::write(
        &args[1],
        logits.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
    )?;
    Ok(())
}
