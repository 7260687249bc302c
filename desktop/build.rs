//! Draws the window icon that `tauri::generate_context!` embeds (`icons/icon.png`, not kept in
//! git: `src/icons.rs` is its source), then runs Tauri's build step.

#[path = "src/icons.rs"]
#[allow(dead_code)]
mod icons;

use std::path::Path;

const SIZE: u32 = 128;

fn main() {
    println!("cargo:rerun-if-changed=src/icons.rs");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("icons");
    std::fs::create_dir_all(&dir).expect("create desktop/icons");
    let file = std::fs::File::create(dir.join("icon.png")).expect("create icons/icon.png");
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), SIZE, SIZE);
    encoder.set_color(png::ColorType::Rgba);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("write the icon's PNG header");
    writer
        .write_image_data(&icons::rgba(icons::Look::Running, SIZE))
        .expect("write the icon's pixels");
    writer.finish().expect("finish icons/icon.png");
    tauri_build::build();
}
