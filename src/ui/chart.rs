//! The job page's chart of space over time, drawn on the server as SVG (no
//! script, nothing loaded from elsewhere): each snapshot's apparent size,
//! the bytes only it holds (what deleting it would free), and the level of
//! what all the snapshots take on disk together.

use maud::{Markup, html};

use super::data::SnapRow;
use crate::report::human_bytes;

const W: f64 = 960.0;
const H: f64 = 220.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 24.0;
const TOP: f64 = 10.0;

/// The chart, or nothing when no snapshot has sizes.
pub fn space(rows: &[SnapRow], total: u64) -> Markup {
    let sized: Vec<(&SnapRow, crate::cmd::list::Usage)> = rows.iter().filter_map(|r| r.usage.map(|u| (r, u))).collect();
    if sized.is_empty() {
        return html! {};
    }
    let max = sized.iter().map(|(_, u)| u.apparent).chain([total]).max().unwrap_or(0).max(1);
    let n = sized.len();
    let x =
        |i: usize| if n == 1 { LEFT + (W - LEFT) / 2.0 } else { LEFT + (W - LEFT - 10.0) * i as f64 / (n - 1) as f64 };
    let y = |v: u64| TOP + (H - TOP - BOTTOM) * (1.0 - v as f64 / max as f64);
    let line = |vals: &mut dyn Iterator<Item = u64>| -> String {
        vals.enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i), y(v))).collect::<Vec<_>>().join(" ")
    };
    let apparent = line(&mut sized.iter().map(|(_, u)| u.apparent));
    let unique = line(&mut sized.iter().map(|(_, u)| u.unique));
    let first = sized[0].0.snapshot.time.format("%Y-%m-%d").to_string();
    let last = sized[n - 1].0.snapshot.time.format("%Y-%m-%d").to_string();
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label="Space over time" {
                line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W) y2=(H - BOTTOM) {}
                line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) {}
                text.label x=(LEFT - 6.0) y=(TOP + 10.0) text-anchor="end" { (human_bytes(max)) }
                text.label x=(LEFT - 6.0) y=(H - BOTTOM) text-anchor="end" { "0" }
                text.label x=(LEFT) y=(H - 6.0) { (first) }
                text.label x=(W - 4.0) y=(H - 6.0) text-anchor="end" { (last) }
                polyline.s-apparent points=(apparent) {}
                line.s-total x1=(LEFT) y1=(format!("{:.1}", y(total))) x2=(W - 10.0) y2=(format!("{:.1}", y(total))) {}
                polyline.s-unique points=(unique) {}
                @for (i, (r, u)) in sized.iter().enumerate() {
                    circle.s-apparent cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", y(u.apparent))) r="3" {
                        title { (r.snapshot.folder) ": " (human_bytes(u.apparent)) ", only here " (human_bytes(u.unique)) }
                    }
                }
            }
            figcaption {
                span.key.s-apparent { "apparent size" }
                span.key.s-unique { "only in that snapshot" }
                span.key.s-total { "all snapshots on disk" }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::list::Usage;
    use crate::store::named_in_order;

    fn rows(sizes: &[(u64, u64)]) -> Vec<SnapRow> {
        let names = ["s.01-01-20_00-00-00", "s.02-01-20_00-00-00", "s.03-01-20_00-00-00"];
        named_in_order(&names[..sizes.len()])
            .into_iter()
            .zip(sizes)
            .map(|(snapshot, &(apparent, unique))| SnapRow {
                snapshot,
                usage: Some(Usage { apparent, unique }),
                counts: None,
                replicas: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn the_chart_scales_to_the_largest_figure_and_draws_every_snapshot() {
        let svg = space(&rows(&[(100, 100), (300, 50), (200, 0)]), 400).into_string();
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains(">400 B<"), "the axis reaches the total: {svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }

    #[test]
    fn one_snapshot_or_empty_sizes_draw_without_dividing_by_zero() {
        let svg = space(&rows(&[(0, 0)]), 0).into_string();
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(space(&[], 0).into_string(), "");
    }
}
