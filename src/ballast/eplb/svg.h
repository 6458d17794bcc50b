#pragma once
// Small self-contained SVG charts for `ballast eplb report` and `replay`.
#include <string>
#include <vector>

namespace ballast::eplb {

struct Series {
  std::string name;
  std::vector<double> y;
};

// Line chart of several series over their index.
std::string svg_lines(const std::string& title, const std::string& xlabel, const std::string& ylabel,
                      const std::vector<Series>& series);

// Heatmaps side by side (e.g. before / after): each value[row][col] is shaded relative to
// the panel's row mean (1.0 white, above red, below blue).
struct Heatmap {
  std::string title;
  std::vector<std::vector<double>> value;  // [rows][cols]
};
std::string svg_heatmaps(const std::string& title, const std::string& row_label, const std::string& col_label,
                         const std::vector<Heatmap>& panels);

}  // namespace ballast::eplb
