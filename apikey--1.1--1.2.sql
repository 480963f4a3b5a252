/* apikey--1.1--1.2.sql */

-- complain if script is sourced in psql, rather than via ALTER EXTENSION
\echo Use "ALTER EXTENSION apikey UPDATE TO '1.2'" to load this file. \quit

-- 1.2: what the outside attack review found, closed (see the README's
-- security model).  Sections are added below, one per concern.
