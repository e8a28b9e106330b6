// Command imageserver shows how a Go service wraps its image-metadata lookup with imgcache.
//
// It serves GET /images/{entity}/{id}/{type}, such as /images/artists/1/avatar, from a directory of
// sample PNGs that it writes at start. The directory stands in for a real service's database or
// object store: loading one image's metadata means opening the file, hashing it for the ETag and
// decoding its header for the dimensions, and that is the work a cache hit saves. A conditional
// request answered with 304 touches neither Redis nor the disk once the metadata is in L1.
//
// Environment:
//
//	ADDR        listen address (default 127.0.0.1:8080, loopback: PUT is unauthenticated)
//	REDIS_ADDR  Redis host:port; empty starts an embedded miniredis, so the example runs anywhere
//	DEBUG=1     log at debug level, which includes every L2 GET and SET with its result
//
// Try:
//
//	go run ./examples/imageserver
//	curl -i localhost:8080/images/artists/1/avatar
//	curl -i -H 'If-None-Match: "<etag from above>"' localhost:8080/images/artists/1/avatar
//	curl -i -X PUT --data-binary @other.png localhost:8080/images/artists/1/avatar
//	curl localhost:8080/stats
//	curl localhost:8080/metrics
package main

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"

	"github.com/imgcache/imgcache"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Getenv, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "imageserver:", err)
		os.Exit(1)
	}
}

// run serves until ctx ends. It reads its configuration through getenv and logs to logw, so a test
// can run the whole program. It stops in the reverse order of starting: the HTTP server first, so
// that no handler uses the cache any more, then the cache, which waits for loads still running and
// their Redis writes, then Redis.
func run(ctx context.Context, getenv func(string) string, logw io.Writer) error {
	level := slog.LevelInfo
	if getenv("DEBUG") == "1" {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(logw, &slog.HandlerOptions{Level: level}))

	redisAddr := getenv("REDIS_ADDR")
	if redisAddr == "" {
		mr, err := miniredis.Run()
		if err != nil {
			return fmt.Errorf("start embedded redis: %w", err)
		}
		defer mr.Close()
		redisAddr = mr.Addr()
		log.Info("REDIS_ADDR is empty: started an embedded miniredis", "addr", redisAddr)
	}
	// ContextTimeoutEnabled makes go-redis honour the deadline imgcache puts on every call
	// (Options.L2Timeout), so a stalled Redis costs a request 100 ms rather than the client's 3 s
	// ReadTimeout. imgcache.New refuses a client without it.
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr, ContextTimeoutEnabled: true})
	defer rdb.Close()
	pingCtx, cancel := context.WithTimeout(ctx, time.Second)
	if err := rdb.Ping(pingCtx).Err(); err != nil {
		// Not fatal: the cache reads a Redis failure as a miss and goes on with L1 and the loader.
		log.Warn("redis does not answer; serving from L1 and the loader until it does", "addr", redisAddr, "error", err)
	}
	cancel()

	cache, err := imgcache.New[imgcache.ImageMeta](imgcache.Options{Redis: rdb, Namespace: "imageserver", Logger: log})
	if err != nil {
		return err
	}
	defer cache.Close()

	dir, err := os.MkdirTemp("", "imageserver-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := writeSamples(dir); err != nil {
		return fmt.Errorf("write sample images: %w", err)
	}
	log.Info("wrote sample images", "dir", dir)

	ln, err := net.Listen("tcp", cmp.Or(getenv("ADDR"), "127.0.0.1:8080"))
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           newServer(cache, dir, log),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	log.Info("listening", "addr", ln.Addr().String())

	select {
	case err := <-served:
		return err // Serve failed; it never returns nil
	case <-ctx.Done():
	}
	log.Info("shutting down")
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	<-served // http.ErrServerClosed
	return nil
}

// writeSamples fills dir with the images a fresh machine has none of, laid out as the URLs name them,
// <dir>/<entity>/<id>/<type>: avatars and backgrounds of artists 1 to 3, covers of albums 1 to 3.
// The files have no extension because the loader tells the format from the content.
func writeSamples(dir string) error {
	for _, s := range []struct {
		entity, typ string
		w, h        int
	}{{"artists", "avatar", 64, 64}, {"artists", "background", 320, 180}, {"albums", "cover", 128, 128}} {
		for id := 1; id <= 3; id++ {
			c := color.RGBA{R: uint8(70 * id), G: uint8(s.w % 256), B: uint8(s.h % 256), A: 255}
			data, err := encodePNG(s.w, s.h, c)
			if err != nil {
				return err
			}
			if _, err := replaceFile(filepath.Join(dir, s.entity, strconv.Itoa(id), s.typ), data); err != nil {
				return err
			}
		}
	}
	return nil
}

// encodePNG returns a w×h PNG of one colour.
func encodePNG(w, h int, c color.Color) ([]byte, error) {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.Set(x, y, c)
		}
	}
	var buf bytes.Buffer
	err := png.Encode(&buf, img)
	return buf.Bytes(), err
}
