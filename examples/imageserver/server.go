package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	_ "image/gif"  // register the decoder: the loader and PUT accept GIF
	_ "image/jpeg" // and JPEG, besides PNG
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/imgcache/imgcache"
)

// maxUpload bounds the body of a PUT.
const maxUpload = 10 << 20

// server answers image requests with metadata from the cache and bytes from the image directory.
type server struct {
	cache *imgcache.Cache[imgcache.ImageMeta]
	dir   string
	log   *slog.Logger
}

// newServer returns the service's handler, serving the images in dir through cache:
//
//	GET|HEAD /images/{entity}/{id}/{type}  the image, or 304, 400 or 404
//	PUT      /images/{entity}/{id}/{type}  replace the image (the body) and invalidate its entry
//	GET      /metrics                       Prometheus metrics of the cache
//	GET      /stats                         the cache's Stats as JSON, with HitRate
func newServer(cache *imgcache.Cache[imgcache.ImageMeta], dir string, log *slog.Logger) http.Handler {
	s := &server{cache: cache, dir: dir, log: log}
	// A registry of its own rather than the global one, so that a test can build many servers.
	reg := prometheus.NewRegistry()
	reg.MustRegister(imgcache.NewCollector("images", cache))

	// A GET pattern matches HEAD too, and the mux answers other methods with 405 and an Allow header.
	mux := http.NewServeMux()
	mux.HandleFunc("GET /images/{entity}/{id}/{type}", s.getImage)
	mux.HandleFunc("PUT /images/{entity}/{id}/{type}", s.putImage)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /stats", s.stats)
	return mux
}

// target returns the request's cache key and the image's file name relative to s.dir, or answers
// 400 and returns false. The file name is built from the key's normalised parts, not from the raw
// path, so that two spellings of one key ("Artists", "artists") cannot name two different files.
func (s *server) target(w http.ResponseWriter, r *http.Request) (imgcache.Key, string, bool) {
	typ := strings.TrimSpace(r.PathValue("type")) // as Key.With trims it
	k := imgcache.NewKey(r.PathValue("entity"), r.PathValue("id")).With("type", typ)
	if err := k.Err(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return k, "", false
	}
	parts := []string{k.Entity(), k.ID(), typ}
	for _, p := range parts {
		// The mux decodes %2F inside a segment, so a segment can still hold a separator or be "..".
		// A leading dot also keeps PUT's temporary files out of reach.
		if !filepath.IsLocal(p) || strings.ContainsAny(p, `/\`) || strings.HasPrefix(p, ".") {
			http.Error(w, fmt.Sprintf("invalid path segment %q", p), http.StatusBadRequest)
			return k, "", false
		}
	}
	return k, filepath.Join(parts...), true
}

// getImage serves an image. A 304 or a HEAD is answered from the metadata alone; a full GET opens
// the file and first checks that it is still the one the metadata describes. It can be newer: another
// instance's L1 keeps an entry for up to Options.L1TTL after a PUT there, and a load that read the old
// file can finish after a PUT's Delete. Then the entry is deleted and looked up again, once.
func (s *server) getImage(w http.ResponseWriter, r *http.Request) {
	k, name, ok := s.target(w, r)
	if !ok {
		return
	}
	for attempt := 1; ; attempt++ {
		meta, err := s.cache.GetOrLoad(r.Context(), k, func(context.Context) (imgcache.ImageMeta, error) {
			return s.load(name)
		})
		if err != nil {
			s.fail(w, r, k, err)
			return
		}
		notModified := notModified(r, meta)
		var f *os.File
		if !notModified && r.Method == http.MethodGet {
			if f = s.open(meta); f == nil {
				if attempt == 1 {
					s.log.Info("cached image metadata is stale; reloading", "key", k.String())
					if err := s.cache.Delete(r.Context(), k); err != nil {
						s.log.Warn("cache delete failed", "key", k.String(), "error", err)
					}
					continue
				}
				http.Error(w, "image is changing; retry", http.StatusServiceUnavailable)
				return
			}
		}
		h := w.Header()
		h.Set("ETag", meta.ETag)
		h.Set("Cache-Control", "public, max-age=31536000, immutable")
		if notModified {
			w.WriteHeader(http.StatusNotModified)
			return
		}
		h.Set("Content-Type", meta.MIMEType)
		h.Set("Content-Length", strconv.FormatInt(meta.Size, 10))
		h.Set("Last-Modified", meta.ModTime.UTC().Format(http.TimeFormat))
		if f != nil {
			if _, err := io.Copy(w, f); err != nil {
				s.log.Debug("sending image failed", "key", k.String(), "error", err)
			}
			f.Close()
		}
		return
	}
}

// fail answers a failed lookup. ErrNotFound is the loader's "no such image", fresh or remembered;
// anything else is a failed load, which the cache does not remember, or a cache being closed.
func (s *server) fail(w http.ResponseWriter, r *http.Request, k imgcache.Key, err error) {
	switch {
	case errors.Is(err, imgcache.ErrNotFound):
		http.Error(w, "image not found", http.StatusNotFound)
	case errors.Is(err, imgcache.ErrClosed):
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
	case r.Context().Err() != nil:
		// The client has gone. The load goes on for anyone else waiting for the same image.
	default:
		s.log.Error("image lookup failed", "key", k.String(), "error", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
	}
}

// load is the lookup the cache wraps, as a real service would query its database. It reads the file
// once, hashing all of it for the ETag and decoding its header for the dimensions. A missing file is
// reported by wrapping imgcache.ErrNotFound, so that the cache remembers the 404 for
// Options.NegativeTTL: a client asking for an unknown image in a loop does not reach the disk.
func (s *server) load(name string) (imgcache.ImageMeta, error) {
	f, err := os.Open(filepath.Join(s.dir, name))
	if errors.Is(err, fs.ErrNotExist) {
		return imgcache.ImageMeta{}, fmt.Errorf("%s: %w", name, imgcache.ErrNotFound)
	}
	if err != nil {
		return imgcache.ImageMeta{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return imgcache.ImageMeta{}, err
	}
	if !fi.Mode().IsRegular() {
		return imgcache.ImageMeta{}, fmt.Errorf("%s is not a file: %w", name, imgcache.ErrNotFound)
	}
	hash := sha256.New()
	tee := io.TeeReader(f, hash)
	cfg, format, err := image.DecodeConfig(tee)
	if err != nil {
		return imgcache.ImageMeta{}, fmt.Errorf("%s: %w", name, err)
	}
	if _, err := io.Copy(io.Discard, tee); err != nil {
		return imgcache.ImageMeta{}, err
	}
	return imgcache.ImageMeta{
		// Relative, because the instances that share Redis may mount the images in different places.
		Path:     name,
		Size:     fi.Size(),
		MIMEType: "image/" + format,
		Width:    cfg.Width,
		Height:   cfg.Height,
		// A strong validator must change whenever the bytes do. A hash does; size and mtime need not,
		// for a same-size rewrite within the file system's timestamp resolution.
		ETag:    `"` + base64.RawURLEncoding.EncodeToString(hash.Sum(nil)[:16]) + `"`,
		ModTime: fi.ModTime(),
	}, nil
}

// open opens the file meta describes, or returns nil if it is gone or has changed since meta was
// loaded. PUT replaces files by renaming, so a changed file has a new size or modification time.
func (s *server) open(meta imgcache.ImageMeta) *os.File {
	f, err := os.Open(filepath.Join(s.dir, meta.Path))
	if err != nil {
		return nil
	}
	if fi, err := f.Stat(); err == nil && fi.Size() == meta.Size && fi.ModTime().Equal(meta.ModTime) {
		return f
	}
	f.Close()
	return nil
}

// notModified evaluates the preconditions of a GET or HEAD (RFC 9110, section 13.2.2):
// If-None-Match when the request has it, If-Modified-Since otherwise.
func notModified(r *http.Request, meta imgcache.ImageMeta) bool {
	if inm := r.Header.Values("If-None-Match"); len(inm) > 0 {
		return etagListMatches(strings.Join(inm, ","), meta.ETag)
	}
	ims, err := http.ParseTime(r.Header.Get("If-Modified-Since"))
	// HTTP dates count whole seconds: a file modified within the second named is not newer.
	return err == nil && !meta.ModTime.Truncate(time.Second).After(ims)
}

// etagListMatches reports whether an If-None-Match list matches etag by weak comparison (RFC 9110,
// section 8.8.3.2): "*" matches any current representation, and W/"x" matches "x". The scan stops at
// a malformed member without a match, which leads to the full response: the safe answer.
func etagListMatches(list, etag string) bool {
	etag = strings.TrimPrefix(etag, "W/")
	for {
		list = strings.TrimLeft(list, " \t,")
		if list == "" {
			return false
		}
		if list[0] == '*' {
			return true
		}
		tag := strings.TrimPrefix(list, "W/")
		end := strings.IndexByte(tag[min(1, len(tag)):], '"')
		if tag == "" || tag[0] != '"' || end < 0 {
			return false
		}
		tag, list = tag[:end+2], tag[end+2:]
		if tag == etag {
			return true
		}
	}
}

// putImage replaces or creates an image: the admin side of the cache. It writes the file and then
// deletes the key, in that order: deleting first would let a request in between cache the old file
// again. A real service would authenticate this; the example listens on loopback.
func (s *server) putImage(w http.ResponseWriter, r *http.Request) {
	k, name, ok := s.target(w, r)
	if !ok {
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxUpload))
	if tooBig := (*http.MaxBytesError)(nil); errors.As(err, &tooBig) {
		http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
		return
	} else if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if _, _, err := image.DecodeConfig(bytes.NewReader(body)); err != nil {
		http.Error(w, "body is not a PNG, JPEG or GIF image: "+err.Error(), http.StatusUnsupportedMediaType)
		return
	}
	created, err := replaceFile(filepath.Join(s.dir, name), body)
	if err != nil {
		s.log.Error("writing image failed", "key", k.String(), "error", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	if err := s.cache.Delete(r.Context(), k); err != nil {
		// The file is in place, but Redis may still hold the old metadata until its TTL ends; retrying
		// the PUT, which is idempotent, deletes it.
		s.log.Error("cache invalidation failed", "key", k.String(), "error", err)
		http.Error(w, "image stored but the cache not invalidated; retry", http.StatusServiceUnavailable)
		return
	}
	s.log.Info("image replaced", "key", k.String(), "bytes", len(body), "created", created)
	if created {
		w.WriteHeader(http.StatusCreated)
	} else {
		w.WriteHeader(http.StatusNoContent)
	}
}

// replaceFile writes data to path through a temporary file and a rename, so that a reader sees the
// old file or the new one, never part of one. It reports whether path did not exist before.
func replaceFile(path string, data []byte) (created bool, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	_, err = os.Stat(path)
	created = errors.Is(err, fs.ErrNotExist)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".upload-")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name()) // fails harmlessly after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	return created, os.Rename(tmp.Name(), path)
}

// stats reports the cache's counters as JSON, with the hit rate that Stats computes.
func (s *server) stats(w http.ResponseWriter, _ *http.Request) {
	st := s.cache.Stats()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(struct {
		imgcache.Stats
		HitRate float64
	}{st, st.HitRate()})
}
