// Command benchsum reads `go test -bench` output (several rounds, any order), and prints, for each
// benchmark row, the median and the range of every metric, with imgcache's median ns/op over each
// peer's. Rows are named <Benchmark>/.../<peer>; the rows that share everything but the peer are
// one operation. A row that reports an imgcache/peer metric (BenchmarkPaired) shows that ratio,
// taken in one loop, instead. It can also write the summary as JSON for cmd/plot.
//
//	go run ./cmd/benchsum -json results/summary.json results/raw.txt
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Row is one benchmark row's results across rounds.
type Row struct {
	Op         string             `json:"op"`         // e.g. "L2Hit/g=64"
	Peer       string             `json:"peer"`       // e.g. "imgcache"
	Goroutines int                `json:"goroutines"` // from "g=N" in the name, 0 if none
	Rounds     int                `json:"rounds"`
	Median     map[string]float64 `json:"median"` // by unit: "ns/op", "B/op", "allocs/op", ...
	Min        map[string]float64 `json:"min"`
	Max        map[string]float64 `json:"max"`
	samples    map[string][]float64
	units      []string
}

var procSuffix = regexp.MustCompile(`-\d+$`)

func main() {
	jsonPath := flag.String("json", "", "write the summary to this JSON file")
	flag.Parse()
	rows := map[string]*Row{}
	var order []string
	read := func(f *os.File) {
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 4 || !strings.HasPrefix(fields[0], "Benchmark") {
				continue
			}
			if _, err := strconv.Atoi(fields[1]); err != nil {
				continue
			}
			name := procSuffix.ReplaceAllString(strings.TrimPrefix(fields[0], "Benchmark"), "")
			r := rows[name]
			if r == nil {
				i := strings.LastIndex(name, "/")
				if i < 0 {
					continue
				}
				r = &Row{Op: name[:i], Peer: name[i+1:], samples: map[string][]float64{}}
				for _, part := range strings.Split(r.Op, "/") {
					if g, ok := strings.CutPrefix(part, "g="); ok {
						r.Goroutines, _ = strconv.Atoi(g)
					}
				}
				rows[name] = r
				order = append(order, name)
			}
			r.Rounds++
			for i := 2; i+1 < len(fields); i += 2 {
				v, err := strconv.ParseFloat(fields[i], 64)
				if err != nil {
					continue
				}
				unit := fields[i+1]
				if _, ok := r.samples[unit]; !ok {
					r.units = append(r.units, unit)
				}
				r.samples[unit] = append(r.samples[unit], v)
			}
		}
		if err := sc.Err(); err != nil {
			log.Fatal(err)
		}
	}
	if flag.NArg() == 0 {
		read(os.Stdin)
	}
	for _, path := range flag.Args() {
		f, err := os.Open(path)
		if err != nil {
			log.Fatal(err)
		}
		read(f)
		f.Close()
	}
	if len(rows) == 0 {
		log.Fatal("no benchmark rows in the input")
	}
	var out []*Row
	for _, name := range order {
		r := rows[name]
		r.Median, r.Min, r.Max = map[string]float64{}, map[string]float64{}, map[string]float64{}
		for unit, s := range r.samples {
			sort.Float64s(s)
			r.Median[unit] = median(s)
			r.Min[unit], r.Max[unit] = s[0], s[len(s)-1]
		}
		out = append(out, r)
	}
	// Operations in order of first appearance; in each, imgcache first, then the peers as they came.
	var ops []string
	byOp := map[string][]*Row{}
	for _, r := range out {
		if _, ok := byOp[r.Op]; !ok {
			ops = append(ops, r.Op)
		}
		byOp[r.Op] = append(byOp[r.Op], r)
	}
	fmt.Println("| operation | peer | time/op, median (min-max) | imgcache/peer | B/op | allocs/op | other (median) |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for _, op := range ops {
		rs := byOp[op]
		slices.SortStableFunc(rs, func(a, b *Row) int {
			switch {
			case a.Peer == b.Peer:
				return 0
			case a.Peer == "imgcache":
				return -1
			case b.Peer == "imgcache":
				return 1
			}
			return 0
		})
		var ref float64
		if rs[0].Peer == "imgcache" {
			ref = rs[0].Median["ns/op"]
		}
		for _, r := range rs {
			ratio := "-"
			switch paired, ok := r.Median["imgcache/peer"]; {
			case ok: // a BenchmarkPaired row: the ratio of the two operations timed in one loop
				ratio = fmt.Sprintf("%.2fx paired (%.2f-%.2f)", paired, r.Min["imgcache/peer"], r.Max["imgcache/peer"])
			case r.Peer != "imgcache" && ref > 0:
				ratio = fmt.Sprintf("%.2fx", ref/r.Median["ns/op"])
			}
			var other []string
			for _, u := range r.units {
				if u == "ns/op" || u == "B/op" || u == "allocs/op" {
					continue
				}
				other = append(other, fmt.Sprintf("%s %s", num(r.Median[u]), u))
			}
			fmt.Printf("| %s | %s | %s (%s-%s) | %s | %s | %s | %s |\n", op, r.Peer,
				dur(r.Median["ns/op"]), dur(r.Min["ns/op"]), dur(r.Max["ns/op"]), ratio,
				num(r.Median["B/op"]), num(r.Median["allocs/op"]), strings.Join(other, ", "))
		}
	}
	rounds := map[int]int{}
	for _, r := range out {
		rounds[r.Rounds]++
	}
	fmt.Printf("\nrows: %d; rounds per row: %v\n", len(out), rounds)
	if *jsonPath != "" {
		b, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			log.Fatal(err)
		}
		if err := os.WriteFile(*jsonPath, b, 0o644); err != nil {
			log.Fatal(err)
		}
	}
}

func median(s []float64) float64 {
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// dur formats nanoseconds with three significant digits.
func dur(ns float64) string {
	switch {
	case ns < 1e3:
		return strconv.FormatFloat(ns, 'f', sig(ns), 64) + " ns"
	case ns < 1e6:
		return strconv.FormatFloat(ns/1e3, 'f', sig(ns/1e3), 64) + " us"
	default:
		return strconv.FormatFloat(ns/1e6, 'f', sig(ns/1e6), 64) + " ms"
	}
}

func num(v float64) string {
	if v == float64(int64(v)) {
		return strconv.FormatInt(int64(v), 10)
	}
	return strconv.FormatFloat(v, 'f', sig(v), 64)
}

func sig(v float64) int {
	switch {
	case v >= 100:
		return 0
	case v >= 10:
		return 1
	case v >= 1:
		return 2
	default:
		return 3
	}
}
