#include "ballast/eplb/svg.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace ballast::eplb {

static std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;"; else if (c == '>') o += "&gt;"; else if (c == '&') o += "&amp;"; else o += c;
  }
  return o;
}

std::string svg_lines(const std::string& title, const std::string& xlabel, const std::string& ylabel,
                      const std::vector<Series>& series) {
  const double W = 900, H = 420, l = 70, r = 220, t = 40, b = 50;
  double ymin = 1e300, ymax = -1e300;
  size_t n = 0;
  for (const auto& s : series)
    for (double v : s.y) ymin = std::min(ymin, v), ymax = std::max(ymax, v), n = std::max(n, s.y.size());
  if (n == 0) ymin = 0, ymax = 1;
  if (ymax - ymin < 1e-9) ymax = ymin + 1e-3;
  double pad = (ymax - ymin) * 0.05;
  ymin -= pad, ymax += pad;
  auto X = [&](double i) { return l + (W - l - r) * (n > 1 ? i / double(n - 1) : 0.5); };
  auto Y = [&](double v) { return t + (H - t - b) * (1 - (v - ymin) / (ymax - ymin)); };
  const char* colors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};
  std::string o = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='12'>\n"
      "<rect width='100%' height='100%' fill='white'/>\n<text x='{}' y='22' font-size='15'>{}</text>\n",
      W, H, l, esc(title));
  o += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='none' stroke='#888'/>\n", l, t, W - l - r,
                   H - t - b);
  for (int k = 0; k <= 4; ++k) {
    double v = ymin + (ymax - ymin) * k / 4;
    o += fmt::format("<text x='{}' y='{:.1f}' text-anchor='end'>{:.3f}</text>\n", l - 5, Y(v) + 4, v);
    o += fmt::format("<line x1='{}' x2='{}' y1='{:.1f}' y2='{:.1f}' stroke='#eee'/>\n", l, W - r, Y(v), Y(v));
  }
  o += fmt::format("<text x='{}' y='{}' text-anchor='middle'>{}</text>\n", (l + W - r) / 2, H - 12, esc(xlabel));
  o += fmt::format("<text x='14' y='{}' transform='rotate(-90 14 {})' text-anchor='middle'>{}</text>\n", (t + H - b) / 2,
                   (t + H - b) / 2, esc(ylabel));
  o += fmt::format("<text x='{}' y='{}'>0</text><text x='{}' y='{}' text-anchor='end'>{}</text>\n", l, H - b + 15,
                   W - r, H - b + 15, n ? n - 1 : 0);
  for (size_t i = 0; i < series.size(); ++i) {
    const auto& s = series[i];
    std::string pts;
    size_t step = std::max<size_t>(1, s.y.size() / 2000);
    for (size_t k = 0; k < s.y.size(); k += step) pts += fmt::format("{:.1f},{:.1f} ", X(double(k)), Y(s.y[k]));
    const char* c = colors[i % 8];
    o += fmt::format("<polyline fill='none' stroke='{}' stroke-width='1.2' points='{}'/>\n", c, pts);
    o += fmt::format("<rect x='{}' y='{}' width='12' height='12' fill='{}'/><text x='{}' y='{}'>{}</text>\n", W - r + 10,
                     t + 18 * i, c, W - r + 28, t + 18 * i + 10, esc(s.name));
  }
  return o + "</svg>\n";
}

std::string svg_heatmaps(const std::string& title, const std::string& row_label, const std::string& col_label,
                         const std::vector<Heatmap>& panels) {
  const double cell_w = 8, cell_h = 6, gap = 40, l = 50, t = 50;
  size_t rows = 0, cols = 0;
  for (const auto& p : panels) {
    rows = std::max(rows, p.value.size());
    for (const auto& r : p.value) cols = std::max(cols, r.size());
  }
  double pw = cols * cell_w;
  double W = l + panels.size() * (pw + gap) + 20, H = t + rows * cell_h + 60;
  std::string o = fmt::format(
      "<svg xmlns='http://www.w3.org/2000/svg' width='{:.0f}' height='{:.0f}' font-family='sans-serif' "
      "font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{}' y='20' font-size='15'>{}</text>\n",
      W, H, l, esc(title));
  for (size_t i = 0; i < panels.size(); ++i) {
    double x0 = l + i * (pw + gap);
    o += fmt::format("<text x='{}' y='{}'>{}</text>\n", x0, t - 8, esc(panels[i].title));
    for (size_t r = 0; r < panels[i].value.size(); ++r) {
      const auto& row = panels[i].value[r];
      double mean = 0;
      for (double v : row) mean += v;
      mean = row.empty() ? 0 : mean / row.size();
      for (size_t c = 0; c < row.size(); ++c) {
        double rel = mean > 0 ? row[c] / mean : 1.0;  // 1 = mean
        double d = std::clamp((rel - 1.0) / 0.5, -1.0, 1.0);
        int R = d > 0 ? 255 : int(255 * (1 + d)), B = d < 0 ? 255 : int(255 * (1 - d)), Gc = int(255 * (1 - std::abs(d)));
        o += fmt::format("<rect x='{:.0f}' y='{:.0f}' width='{}' height='{}' fill='rgb({},{},{})'/>\n", x0 + c * cell_w,
                         t + r * cell_h, cell_w, cell_h, R, Gc, B);
      }
    }
    o += fmt::format("<text x='{}' y='{:.0f}'>{} (x) / {} (y); white = mean, red = +50%, blue = -50%</text>\n", x0,
                     t + rows * cell_h + 18, esc(col_label), esc(row_label));
  }
  return o + "</svg>\n";
}

}  // namespace ballast::eplb
