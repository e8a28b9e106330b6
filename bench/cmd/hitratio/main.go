// Command hitratio prints the L1 hit ratio of imgcache and its peers on a Zipf trace and on a
// scan-heavy trace, and writes every result as CSV for cmd/plot.
//
//	go run ./cmd/hitratio -csv results/hitratio.csv
package main

import (
	"encoding/csv"
	"flag"
	"fmt"
	"log"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/imgcache/imgcache/bench"
)

func main() {
	lookups := flag.Int("lookups", 1_000_000, "lookups per trace")
	sizesFlag := flag.String("sizes", "1000,2500,5000,10000,25000,50000", "L1 sizes for the curve (the table is at 10000)")
	csvPath := flag.String("csv", "", "write every result to this CSV file")
	flag.Parse()
	var sizes []int
	for _, s := range strings.Split(*sizesFlag, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n <= 0 {
			log.Fatalf("bad size %q", s)
		}
		sizes = append(sizes, n)
	}
	start := time.Now()
	const zipfRun, scanRun = 30_000, 20_000
	zipf := bench.ZipfTrace(*lookups, bench.ZipfKeys, bench.ZipfS, 42)
	scan, maxID := bench.ScanTrace(*lookups, bench.ZipfKeys, bench.ZipfS, zipfRun, scanRun, 43)
	tk := bench.NewTraceKeys(maxID)
	traces := []bench.Trace{{Name: "zipf", IDs: zipf, Keys: tk}, {Name: "scan", IDs: scan, Keys: tk}}
	res, err := bench.Simulate(traces, bench.Policies(), sizes)
	if err != nil {
		log.Fatal(err)
	}

	fmt.Printf("L1 hit ratio, %d lookups per trace, L1 of %d entries, all lookups counted (cold start included)\n",
		*lookups, bench.L1Capacity)
	fmt.Printf("zipf: Zipf s=%.1f over %d keys. scan: blocks of %d such lookups, each followed by a scan of %d new keys never seen again (%.0f%% of lookups)\n\n",
		bench.ZipfS, bench.ZipfKeys, zipfRun, scanRun, 100*float64(scanRun)/float64(zipfRun+scanRun))
	fmt.Println("| policy | zipf | scan-heavy |")
	fmt.Println("|---|---|---|")
	for _, p := range bench.Policies() {
		row := "| " + p.Name
		for _, t := range traces {
			for _, r := range res {
				if r.Policy == p.Name && r.Trace == t.Name && r.Size == bench.L1Capacity {
					row += fmt.Sprintf(" | %.2f%%", 100*r.Ratio())
				}
			}
		}
		fmt.Println(row + " |")
	}
	fmt.Printf("\n(%d replays in %v)\n", len(res), time.Since(start).Round(time.Second))

	if *csvPath != "" {
		f, err := os.Create(*csvPath)
		if err != nil {
			log.Fatal(err)
		}
		w := csv.NewWriter(f)
		_ = w.Write([]string{"trace", "policy", "size", "hits", "lookups", "ratio"})
		for _, r := range res {
			_ = w.Write([]string{r.Trace, r.Policy, strconv.Itoa(r.Size), strconv.Itoa(r.Hits), strconv.Itoa(r.Lookups),
				strconv.FormatFloat(r.Ratio(), 'f', 6, 64)})
		}
		w.Flush()
		if err := w.Error(); err != nil {
			log.Fatal(err)
		}
		if err := f.Close(); err != nil {
			log.Fatal(err)
		}
	}
}
