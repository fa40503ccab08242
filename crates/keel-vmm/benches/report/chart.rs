//! Grouped bar charts as SVG through plotters' `SVGBackend`. Text goes into the SVG as
//! `<text>` elements (plotters is built without its `ttf` feature, so nothing looks up
//! fonts on the host; the viewer renders the text).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// One bar colour per series, the same VMM in the same colour on every chart.
pub const KEEL: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub const QEMU: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
pub const LIMIT: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);

/// A series of bars: its name in the legend, its colour, one value per group.
pub struct Series<'a> {
    pub name: &'a str,
    pub color: RGBColor,
    pub values: Vec<f64>,
}

/// One panel: groups of bars side by side, a value printed above each bar.
pub struct Panel<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub groups: Vec<String>,
    pub series: Vec<Series<'a>>,
    /// Decimals of the values printed on the bars.
    pub decimals: usize,
}

type Error = Box<dyn std::error::Error>;

/// Writes `panels` side by side into the SVG file `path`, `width` x `height` pixels in all.
pub fn write(path: &Path, width: u32, height: u32, panels: &[Panel]) -> Result<(), Error> {
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(&areas) {
        draw(panel, area)?;
    }
    root.present()?;
    Ok(())
}

fn draw(panel: &Panel, area: &DrawingArea<SVGBackend, Shift>) -> Result<(), Error> {
    let max = panel
        .series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .fold(0.0, f64::max);
    // Head room for the values above the bars and for the legend.
    let top = if max > 0.0 { max * 1.45 } else { 1.0 };
    let n = panel.groups.len();
    // Group g spans g..g+1 on the x axis; its bars sit side by side in the middle 3/4.
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 17))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(62)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc(panel.y_desc)
        .y_label_style(("sans-serif", 12))
        .draw()?;
    let k = panel.series.len().max(1) as f64;
    let (pad, w) = (0.125, 0.75 / k);
    let value_style = ("sans-serif", 11)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, s) in panel.series.iter().enumerate() {
        let bars = s.values.iter().enumerate().filter(|(_, v)| v.is_finite());
        let left = move |g: usize| g as f64 + pad + j as f64 * w;
        chart
            .draw_series(bars.clone().map(|(g, &v)| {
                Rectangle::new(
                    [(left(g) + 0.004, v), (left(g) + w - 0.004, 0.0)],
                    s.color.filled(),
                )
            }))?
            .label(s.name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], s.color.filled()));
        chart.draw_series(bars.map(|(g, &v)| {
            Text::new(
                format!("{v:.*}", panel.decimals),
                (left(g) + w / 2.0, v + top / 100.0),
                value_style.clone(),
            )
        }))?;
    }
    // The group names under the axis, in the panel's pixels (outside the plotting area).
    let label_style = ("sans-serif", 12)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let (ox, oy) = area.get_base_pixel();
    for (g, name) in panel.groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        area.draw(&Text::new(
            name.as_str(),
            (x - ox, y - oy + 8),
            label_style.clone(),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 12))
        .margin(8)
        .draw()?;
    Ok(())
}
