// A sweep's results in its output_dir: results.csv, results.md and gnuplot charts.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include "tools/sweep/metrics.h"
#include "tools/sweep/spec.h"

namespace rmoe::sweep {

// The columns of results.csv, and the file's text: one row per point, in point order.
std::vector<std::string> ResultColumns(const Sweep& sweep);
std::string ResultsCsv(const Sweep& sweep, const std::vector<PointResult>& results);
// results.md: the per-point table and the per-configuration summary (mean and sample std
// over repeats).
std::string ResultsMarkdown(const Sweep& sweep, const std::vector<PointResult>& results);

// Writes loss_curves and val_curves .{dat,gp,png} (and scaling.* when ranks is an axis) into
// dir, running gnuplot when it is on the PATH (else a warning on `log` and only the .dat
// and .gp files). Returns the PNGs drawn.
std::vector<std::string> WritePlots(const Sweep& sweep, const std::vector<PointResult>& results,
                                    const std::vector<RunMetrics>& metrics,
                                    const std::string& dir, FILE* log);

}  // namespace rmoe::sweep
