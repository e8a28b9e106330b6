// Command plot draws the benchmark results as PNG files with gonum/plot:
//
//	throughput.png  L1 and L2 hits: throughput against goroutines, per peer (bars: min-max)
//	latency.png     time per operation, per peer, log scale (bars: min-max)
//	hitratio.png    L1 hit ratio against L1 size, per policy, on the Zipf and the scan-heavy trace
//
//	go run ./cmd/plot -summary results/summary.json -hitratio results/hitratio.csv -out results
package main

import (
	"encoding/csv"
	"encoding/json"
	"flag"
	"fmt"
	"image/color"
	"log"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// row is cmd/benchsum's JSON.
type row struct {
	Op         string             `json:"op"`
	Peer       string             `json:"peer"`
	Goroutines int                `json:"goroutines"`
	Median     map[string]float64 `json:"median"`
	Min        map[string]float64 `json:"min"`
	Max        map[string]float64 `json:"max"`
}

// peerOrder fixes each peer's color and glyph across the plots.
var peerOrder = []string{"imgcache", "golang-lru", "otter", "sturdyc", "go-redis-cache", "go-redis-cache-msgpack", "go-redis-GET+decode", "concat"}

// palette: one distinct color per peer or policy (plotutil's seven repeat).
var palette = []color.Color{
	rgb(0xd6, 0x27, 0x28), // red: imgcache
	rgb(0x2c, 0xa0, 0x2c), // green
	rgb(0x1f, 0x77, 0xb4), // blue
	rgb(0xff, 0x7f, 0x0e), // orange
	rgb(0x94, 0x67, 0xbd), // purple
	rgb(0x8c, 0x56, 0x4b), // brown
	rgb(0xe3, 0x77, 0xc2), // pink
	rgb(0x7f, 0x7f, 0x7f), // grey
	rgb(0x17, 0xbe, 0xcf), // cyan
	rgb(0xbc, 0xbd, 0x22), // olive
}

func rgb(r, g, b uint8) color.Color { return color.RGBA{R: r, G: g, B: b, A: 255} }

func colorOf(i int) color.Color { return palette[i%len(palette)] }

func style(name string) (color.Color, draw.GlyphDrawer, int) {
	i := slices.Index(peerOrder, name)
	if i < 0 {
		i = len(peerOrder)
	}
	return colorOf(i), plotutil.Shape(i), i
}

// policyColor: the hit-ratio policies, in cmd/hitratio's order, matched to the peers' colors
// where a policy is a peer's (imgcache red, golang-lru's LRU green, otter blue, ...).
var policyColor = []int{0, 5, 1, 8, 9, 2, 4, 3, 7}

func main() {
	summary := flag.String("summary", "results/summary.json", "cmd/benchsum's JSON")
	hitratio := flag.String("hitratio", "results/hitratio.csv", "cmd/hitratio's CSV")
	out := flag.String("out", "results", "directory for the PNG files")
	flag.Parse()
	var rows []row
	if b, err := os.ReadFile(*summary); err != nil {
		log.Fatal(err)
	} else if err := json.Unmarshal(b, &rows); err != nil {
		log.Fatal(err)
	}
	must(throughput(rows, filepath.Join(*out, "throughput.png")))
	must(latency(rows, filepath.Join(*out, "latency.png")))
	must(hitRatio(*hitratio, filepath.Join(*out, "hitratio.png")))
}

func must(err error) {
	if err != nil {
		log.Fatal(err)
	}
}

// errXY is points with asymmetric Y error bars.
type errXY struct {
	plotter.XYs
	plotter.YErrors
}

// throughput: one panel per benchmark family, ops/s against goroutines.
func throughput(rows []row, path string) error {
	panels := []struct {
		prefix, title string
		scale         float64
		unit          string
	}{
		{"L1Hit/", "L1 hit (4,096 keys, L1 of 10,000)", 1e6, "million ops/s"},
		{"L2Hit/", "L2 hit, real Redis on loopback", 1e3, "thousand ops/s"},
	}
	var plots []*plot.Plot
	for _, pn := range panels {
		p := plot.New()
		p.Title.Text = pn.title
		p.X.Label.Text = "goroutines"
		p.Y.Label.Text = pn.unit
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = goroutineTicks{}
		p.Y.Min = 0
		p.Legend.Top = true
		p.Legend.Left = true
		p.Legend.XOffs = vg.Inch / 4
		byPeer := map[string][]row{}
		var peers []string
		for _, r := range rows {
			if !strings.HasPrefix(r.Op, pn.prefix) || r.Goroutines == 0 {
				continue
			}
			if _, ok := byPeer[r.Peer]; !ok {
				peers = append(peers, r.Peer)
			}
			byPeer[r.Peer] = append(byPeer[r.Peer], r)
		}
		top := 0.0
		for _, peer := range peers {
			rs := byPeer[peer]
			if len(rs) < 2 {
				continue // a single level (the msgpack row) is no curve
			}
			sort.Slice(rs, func(i, j int) bool { return rs[i].Goroutines < rs[j].Goroutines })
			var e errXY
			for _, r := range rs {
				med := 1e9 / r.Median["ns/op"] / pn.scale
				e.XYs = append(e.XYs, plotter.XY{X: float64(r.Goroutines), Y: med})
				e.YErrors = append(e.YErrors, struct{ Low, High float64 }{
					Low: med - 1e9/r.Max["ns/op"]/pn.scale, High: 1e9/r.Min["ns/op"]/pn.scale - med})
				top = max(top, 1e9/r.Min["ns/op"]/pn.scale)
			}
			if err := addSeries(p, peer, e, false); err != nil {
				return err
			}
		}
		p.Y.Max = 1.3 * top // room for the legend above the curves
		plots = append(plots, p)
	}
	return saveTiles(path, [][]*plot.Plot{plots}, 12*vg.Inch, 5*vg.Inch)
}

// latency: time per operation on a log scale, the peers of each operation side by side.
func latency(rows []row, path string) error {
	ops := []struct{ op, label string }{
		{"L1Hit/g=1", "Get, L1 hit"},
		{"GetOrLoadHit/l1/g=1", "GetOrLoad, L1 hit"},
		{"KeyBuild/g=1", "key build"},
		{"MissLoad/local/g=1", "miss+load, no Redis"},
		{"L2Hit/g=1", "Get, L2 hit"},
		{"GetOrLoadHit/l2/g=1", "GetOrLoad, L2 hit"},
		{"MissLoad/redis/g=1", "miss+load, Redis"},
		{"L2Hit/g=64", "L2 hit, 64 g (wall/op)"},
		{"ZipfMixed/g=64", "Zipf mixed, 64 g (wall/op)"},
	}
	p := plot.New()
	p.Title.Text = "Time per operation: median, bars min-max over rounds (1 goroutine unless marked)"
	p.Y.Label.Text = "ns per operation (log)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Legend.Top = true
	p.Legend.Left = true
	labels := make([]string, len(ops))
	for i, o := range ops {
		labels[i] = o.label
	}
	p.NominalX(labels...)
	p.X.Tick.Label.Font.Size = vg.Points(9)
	series := map[string]*errXY{}
	var peers []string
	for i, o := range ops {
		var rs []row
		for _, r := range rows {
			if r.Op == o.op {
				rs = append(rs, r)
			}
		}
		sort.SliceStable(rs, func(a, b int) bool {
			_, _, ia := style(rs[a].Peer)
			_, _, ib := style(rs[b].Peer)
			return ia < ib
		})
		for j, r := range rs {
			e := series[r.Peer]
			if e == nil {
				e = &errXY{}
				series[r.Peer] = e
				peers = append(peers, r.Peer)
			}
			x := float64(i) + (float64(j)-float64(len(rs)-1)/2)*0.11
			med := r.Median["ns/op"]
			e.XYs = append(e.XYs, plotter.XY{X: x, Y: med})
			e.YErrors = append(e.YErrors, struct{ Low, High float64 }{Low: med - r.Min["ns/op"], High: r.Max["ns/op"] - med})
		}
	}
	sort.SliceStable(peers, func(a, b int) bool {
		_, _, ia := style(peers[a])
		_, _, ib := style(peers[b])
		return ia < ib
	})
	for _, peer := range peers {
		if err := addSeries(p, peer, *series[peer], true); err != nil {
			return err
		}
	}
	return p.Save(13*vg.Inch, 6*vg.Inch, path)
}

// hitRatio: one panel per trace, hit ratio against L1 size.
func hitRatio(path, out string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return err
	}
	type pt struct {
		size  int
		ratio float64
	}
	data := map[string]map[string][]pt{} // trace -> policy -> points
	var policies []string
	for _, r := range recs[1:] {
		trace, policy := r[0], r[1]
		size, _ := strconv.Atoi(r[2])
		ratio, _ := strconv.ParseFloat(r[5], 64)
		if data[trace] == nil {
			data[trace] = map[string][]pt{}
		}
		if !slices.Contains(policies, policy) {
			policies = append(policies, policy)
		}
		data[trace][policy] = append(data[trace][policy], pt{size, ratio})
	}
	var plots []*plot.Plot
	for _, tr := range []struct{ name, title string }{
		{"zipf", "Zipf s=1.1, 100,000 keys, 1M lookups"},
		{"scan", "Scan-heavy: the Zipf trace with one-time scans (40%)"},
	} {
		p := plot.New()
		p.Title.Text = tr.title
		p.X.Label.Text = "L1 size (entries, log)"
		p.Y.Label.Text = "hit ratio (%)"
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = sizeTicks{}
		p.Legend.Top = false
		p.Legend.Left = false
		p.Legend.YOffs = vg.Points(10)
		var top []plot.Plotter
		for i, policy := range policies {
			pts := data[tr.name][policy]
			sort.Slice(pts, func(a, b int) bool { return pts[a].size < pts[b].size })
			xys := make(plotter.XYs, len(pts))
			for j, q := range pts {
				xys[j] = plotter.XY{X: float64(q.size), Y: 100 * q.ratio}
			}
			l, s, err := plotter.NewLinePoints(xys)
			if err != nil {
				return err
			}
			ci := i
			if i < len(policyColor) {
				ci = policyColor[i]
			}
			l.Color, s.Color, s.Shape = colorOf(ci), colorOf(ci), plotutil.Shape(i)
			if strings.HasPrefix(policy, "Belady") {
				l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				l.Color, s.Color = color.Black, color.Black
			}
			p.Legend.Add(policy, l, s)
			if policy == "imgcache L1, PolicyLRU" {
				// Drawn last, and larger: it lies on golang-lru's LRU curve.
				s.Radius = vg.Points(4.5)
				top = []plot.Plotter{l, s}
				continue
			}
			p.Add(l, s)
		}
		p.Add(top...)
		plots = append(plots, p)
	}
	return saveTiles(out, [][]*plot.Plot{plots}, 13*vg.Inch, 5.5*vg.Inch)
}

// addSeries adds a peer's points with their error bars; lines join them unless scatterOnly.
func addSeries(p *plot.Plot, name string, e errXY, scatterOnly bool) error {
	c, shape, _ := style(name)
	s, err := plotter.NewScatter(e.XYs)
	if err != nil {
		return err
	}
	s.Color, s.Shape, s.Radius = c, shape, vg.Points(3.5)
	bars, err := plotter.NewYErrorBars(e)
	if err != nil {
		return err
	}
	bars.Color = c
	p.Add(bars, s)
	if scatterOnly {
		p.Legend.Add(name, s)
		return nil
	}
	l, err := plotter.NewLine(e.XYs)
	if err != nil {
		return err
	}
	l.Color = c
	p.Add(l)
	p.Legend.Add(name, l, s)
	return nil
}

func saveTiles(path string, plots [][]*plot.Plot, w, h vg.Length) error {
	img := vgimg.New(w, h)
	dc := draw.New(img)
	t := draw.Tiles{Rows: len(plots), Cols: len(plots[0]), PadX: vg.Inch / 4, PadY: vg.Inch / 4,
		PadTop: vg.Inch / 8, PadBottom: vg.Inch / 8, PadLeft: vg.Inch / 8, PadRight: vg.Inch / 8}
	// White background: vgimg's default is transparent.
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	cs := plot.Align(plots, t, dc)
	for i := range plots {
		for j := range plots[i] {
			plots[i][j].Draw(cs[i][j])
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// goroutineTicks labels the powers of two on a log axis.
type goroutineTicks struct{}

func (goroutineTicks) Ticks(lo, hi float64) []plot.Tick {
	var ts []plot.Tick
	for v := 1.0; v <= hi*1.01; v *= 2 {
		if v >= lo*0.99 {
			ts = append(ts, plot.Tick{Value: v, Label: strconv.Itoa(int(v))})
		}
	}
	return ts
}

// sizeTicks labels L1 sizes in thousands.
type sizeTicks struct{}

func (sizeTicks) Ticks(lo, hi float64) []plot.Tick {
	var ts []plot.Tick
	for _, v := range []float64{1000, 2500, 5000, 10000, 25000, 50000, 100000} {
		if v >= lo*0.99 && v <= hi*1.01 {
			ts = append(ts, plot.Tick{Value: v, Label: fmt.Sprintf("%gk", v/1000)})
		}
	}
	return ts
}
