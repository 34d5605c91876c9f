//! The training curves carry their text: a title, axis labels, tick values and a legend, drawn with
//! the bundled font into the PNG, and written as text into the SVG.

use sqlora::train::plot::{png, rgb, svg, Series, SIZE, TITLE_H};

/// A run's series: a decaying training loss, three validation losses, a warmup-then-decay lr.
fn series() -> (Vec<Series>, Series) {
    let loss = (1..=60)
        .map(|s| (s as f64, 0.05 + 6.0 * (-(s as f64) / 12.0).exp()))
        .collect();
    let eval = vec![(20.0, 0.4), (40.0, 0.1), (60.0, 0.06)];
    let lr = (1..=60).map(|s| (s as f64, 2e-4 * (s as f64 / 5.0).min(1.0))).collect();
    (
        vec![
            Series {
                name: "training loss",
                color: (31, 119, 180),
                points: loss,
            },
            Series {
                name: "validation loss",
                color: (214, 39, 40),
                points: eval,
            },
        ],
        Series {
            name: "learning rate",
            color: (44, 160, 44),
            points: lr,
        },
    )
}

/// Pixels darker than mid-grey (text is black; grid lines are light grey; the series are coloured
/// but none of their channels is below 31 on all three) in a rectangle.
fn dark(px: &[u8], x: std::ops::Range<u32>, y: std::ops::Range<u32>) -> usize {
    let mut n = 0;
    for yy in y {
        for xx in x.clone() {
            let i = ((yy * SIZE.0 + xx) * 3) as usize;
            if px[i] < 100 && px[i + 1] < 100 && px[i + 2] < 100 {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn the_png_has_a_title_tick_labels_and_axis_names_drawn_in_glyphs() {
    let (losses, lr) = series();
    let px = rgb("training curves: first", &losses, &lr).unwrap();
    assert_eq!(px.len(), (SIZE.0 * SIZE.1 * 3) as usize);
    // The title band holds only the title: dark pixels around the centre, none at the edges.
    let centre = dark(&px, SIZE.0 / 4..3 * SIZE.0 / 4, 0..TITLE_H);
    assert!(centre > 300, "title: {centre} dark pixels");
    assert_eq!(dark(&px, 0..SIZE.0 / 8, 0..TITLE_H), 0, "the title is centred");
    // Another title gives other glyphs in the band, and nowhere else.
    let other = rgb("another title, longer than the first one", &losses, &lr).unwrap();
    let row = (SIZE.0 * 3) as usize;
    let band = TITLE_H as usize * row;
    assert_ne!(px[..band], other[..band], "the title's pixels depend on its text");
    assert_eq!(px[band..], other[band..], "only the title band changed");
    // Left of each panel's plotting area: the y tick values and the axis name, in glyphs.
    let (top, bottom) = (TITLE_H + 40, SIZE.1 - 60);
    let y_labels = dark(&px, 0..70, top..bottom);
    assert!(y_labels > 150, "y tick labels and axis names: {y_labels} dark pixels");
    // Below each panel: the x tick values and "step".
    let lower_axis = dark(&px, 80..SIZE.0, SIZE.1 - 50..SIZE.1);
    assert!(
        lower_axis > 100,
        "x tick labels and the axis name: {lower_axis} dark pixels"
    );
    // The legend names the series: its text differs with the names.
    let mut renamed = series();
    renamed.0[0].name = "loss (renamed)";
    let other = rgb("training curves: first", &renamed.0, &renamed.1).unwrap();
    assert_ne!(px, other, "the legend's text is drawn");
}

#[test]
fn the_png_file_decodes_to_the_same_pixels() {
    let (losses, lr) = series();
    let bytes = png("t", &losses, &lr).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), SIZE);
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(&buf[..info.buffer_size()], &rgb("t", &losses, &lr).unwrap()[..]);
}

#[test]
fn the_svg_has_the_same_text_and_round_non_negative_ticks() {
    let (losses, lr) = series();
    let text = svg("training curves: first", &losses, &lr).unwrap();
    let texts: Vec<String> = text
        .split("<text")
        .skip(1)
        .filter_map(|t| Some(t.split_once('>')?.1.split('<').next()?.trim().to_string()))
        .collect();
    for want in [
        "training curves: first",
        "step",
        "loss",
        "lr",
        "training loss",
        "validation loss",
        "learning rate",
    ] {
        assert!(texts.iter().any(|t| t == want), "no text \"{want}\" in {texts:?}");
    }
    // Tick values are short round numbers; none is negative (the loss axis starts at 0 or above).
    let numbers: Vec<f64> = texts.iter().filter_map(|t| t.parse().ok()).collect();
    assert!(numbers.len() >= 10, "{texts:?}");
    assert!(numbers.iter().all(|&v| v >= 0.0), "{texts:?}");
    assert!(texts.iter().all(|t| t.len() <= 8 || t.contains(' ')), "{texts:?}");
    assert!(texts.iter().any(|t| t == "2e-4" || t == "1e-4"), "lr ticks: {texts:?}");
    assert!(!texts.iter().any(|t| t.ends_with("e0")), "{texts:?}");
}
