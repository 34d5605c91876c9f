//! `train`: fine-tune LoRA adapters on a text-to-SQL data set.

fn main() {
    eprintln!("error: the training loop is not built yet; `train` arrives with the LoRA/autograd work");
    std::process::exit(2);
}
